package org.fedfleet.demo;

import android.content.Intent;
import android.os.Bundle;
import android.os.Handler;
import android.os.Looper;
import android.widget.EditText;
import android.widget.Switch;
import android.widget.TextView;
import androidx.activity.result.ActivityResultLauncher;
import androidx.appcompat.app.AppCompatActivity;
import com.journeyapps.barcodescanner.ScanContract;
import com.journeyapps.barcodescanner.ScanOptions;
import java.util.Locale;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * Where the phone joins a server (typed URL or its QR code), and what it has done: model
 * version, last round, bytes sent, and the local-DP epsilon it has spent.
 */
public final class MainActivity extends AppCompatActivity {
  private final Handler ui = new Handler(Looper.getMainLooper());
  private PhoneState state;
  private EditText server;
  private TextView status;
  private final ActivityResultLauncher<ScanOptions> scan = registerForActivityResult(new ScanContract(), result -> {
    if (result.getContents() != null) {
      join(result.getContents().trim());
    }
  });

  @Override
  protected void onCreate(Bundle saved) {
    super.onCreate(saved);
    setContentView(R.layout.activity_main);
    state = new PhoneState(this);
    server = findViewById(R.id.server);
    status = findViewById(R.id.status);
    server.setText(state.server());
    findViewById(R.id.join).setOnClickListener(v -> join(server.getText().toString().trim()));
    findViewById(R.id.scan).setOnClickListener(v -> scan.launch(new ScanOptions()
        .setDesiredBarcodeFormats(ScanOptions.QR_CODE).setPrompt("Scan the server's QR code")));
    findViewById(R.id.draw).setOnClickListener(v -> startActivity(new Intent(this, DrawActivity.class)));
    findViewById(R.id.train).setOnClickListener(v -> Participation.now(this));
    Switch background = findViewById(R.id.background);
    background.setChecked(state.background());
    background.setOnCheckedChangeListener((b, on) -> {
      state.background(on);
      Participation.background(this, on);
    });
  }

  private void join(String url) {
    if (!url.startsWith("http://") && !url.startsWith("https://")) {
      status.setText("Not a server URL: " + url);
      return;
    }
    server.setText(url);
    state.server(url);
    Participation.now(this);
    refresh();
  }

  @Override
  protected void onResume() {
    super.onResume();
    refresh();
  }

  @Override
  protected void onPause() {
    super.onPause();
    ui.removeCallbacksAndMessages(null);
  }

  /** Re-reads what the worker saved, every two seconds while the screen is visible. */
  private void refresh() {
    ui.removeCallbacksAndMessages(null);
    status.setText(describe());
    ui.postDelayed(this::refresh, 2000);
  }

  private String describe() {
    if (state.server().isEmpty()) {
      return getString(R.string.not_joined);
    }
    String stats = state.stats();
    if (stats == null) {
      return state.name() + " at " + state.server() + "\nnot trained yet";
    }
    try {
      JSONObject s = new JSONObject(stats);
      return String.format(Locale.ROOT, "%s at %s%nmodel version %d, last round %d%nupdates sent %d (refused by "
              + "server: %d)%nbytes sent %d, received %d%nepsilon spent %.3f%ntraining examples %d (%d drawn here)",
          state.name(), state.server(), s.getInt("last_version"), s.getInt("last_round"), s.getInt("participations"),
          s.getInt("rejected"), s.getLong("bytes_up"), s.getLong("bytes_down"), s.getDouble("epsilon"),
          s.getInt("examples"), state.drawnDigits());
    } catch (JSONException e) {
      return "status unreadable: " + e.getMessage();
    }
  }
}
